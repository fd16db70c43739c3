"""The retention plan of one target: what is kept, what goes, and the interlocks that hold a prune back."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from luxima_backup.retention import Item, Policy, plan

NOW = datetime(2026, 11, 30, 1, 0, tzinfo=timezone.utc)
DAY = timedelta(days=1)


def daily(n: int, failed: set[int] = frozenset(), chain_every: int = 0) -> list[Item]:
    """``n`` daily backups, the newest yesterday; ``failed`` days (days ago) unverified; with ``chain_every``, a
    full one every that many days and incrementals reading back to it."""
    items = []
    chain: list[str] = []
    for ago in range(n, 0, -1):
        bid = f"b{ago:03d}"
        if chain_every and (n - ago) % chain_every == 0:
            chain = []
        chain.append(bid)
        items.append(Item(bid, NOW - ago * DAY, ago not in failed, frozenset(chain) if chain_every else frozenset()))
    return items


def kept(p: object) -> list[str]:
    return sorted(d.backup_id for d in p.decisions if d.keep)  # type: ignore[attr-defined]


def test_forty_days_of_daily_backups_keep_thirty_days_and_the_failures_never_count() -> None:
    items = daily(40, failed={1, 2, 3, 35})
    p = plan("db/main", items, Policy(keep_days=30), NOW, timedelta(hours=26 * 5))
    assert p.held is None
    # the three newest failed: the newest verified (4 days ago) is kept, and days 4..30 by age
    assert kept(p) == [f"b{d:03d}" for d in range(30, 3, -1)][::-1]
    removed = {d.backup_id: d.why for d in p.remove}
    assert removed["b001"] == "not verified" and removed["b035"] == "not verified"
    assert removed["b040"] == "outside the policy"
    assert next(d for d in p.decisions if d.backup_id == "b004").why == "within 30 days"


def test_the_newest_verified_backup_is_kept_whatever_its_age() -> None:
    items = [Item("old", NOW - 100 * DAY, True), Item("older", NOW - 200 * DAY, True)]
    p = plan("configs/app1", items, Policy(keep_days=90), NOW, None)
    assert kept(p) == ["old"] and [d.backup_id for d in p.remove] == ["older"]
    assert next(d for d in p.decisions if d.backup_id == "old").why == "the newest verified backup: always kept"


def test_a_target_failing_beyond_its_rpo_is_not_pruned_at_all() -> None:
    items = daily(40, failed=set(range(1, 8)))  # a week of failures
    p = plan("db/main", items, Policy(keep_days=30), NOW, timedelta(hours=26))
    assert p.held is not None and "beyond the RPO window" in p.held and "8.0 days" in p.held
    assert p.remove == []
    assert plan("db/main", [Item("x", NOW - DAY, False)], Policy(keep_days=30), NOW, timedelta(hours=26)).held


def test_a_chain_is_kept_while_a_kept_backup_reads_it_and_goes_whole() -> None:
    items = daily(40, chain_every=10)  # fulls 40, 30, 20, 10 days ago; incrementals between
    p = plan("files/userfiles", items, Policy(keep_days=25), NOW, None, max_delete_percent=100)
    # days 1..25 kept by age; day 25..21 read the full of day 30 and the incrementals 29..26: kept, their chain
    assert kept(p) == [f"b{d:03d}" for d in range(30, 0, -1)][::-1]
    assert next(d for d in p.decisions if d.backup_id == "b030").why.startswith("read by")
    # the whole chain 40..31 goes: nothing kept reads it
    assert sorted(d.backup_id for d in p.remove) == [f"b{d:03d}" for d in range(40, 30, -1)][::-1]


def test_pbs_style_keep_options_count_periods_not_backups() -> None:
    items = []
    for ago in range(60, 0, -1):  # two backups a day, 60 days
        for hour in (2, 14):
            items.append(Item(f"d{ago:02d}h{hour:02d}", NOW.replace(hour=hour) - ago * DAY, True))
    p = plan("db/main", items, Policy(keep_last=3, keep_daily=5, keep_weekly=2, keep_monthly=2), NOW, None, force=True)
    reasons = [d.why for d in p.decisions if d.keep]
    assert sum(r.startswith("keep_last") for r in reasons) == 3
    assert sum(r.startswith("keep_daily") for r in reasons) == 5
    assert sum(r.startswith("keep_weekly") for r in reasons) == 2
    # November is covered already, and there is nothing before October: a month without a backup does not count
    assert [r for r in reasons if r.startswith("keep_monthly")] == ["keep_monthly (2026-10)"]
    assert len(reasons) == 3 + 5 + 2 + 1
    # one per day: the daily ones are the newest of days not already covered
    daily_days = sorted(r.split("(")[1][:-1] for r in reasons if r.startswith("keep_daily"))
    assert len(set(daily_days)) == 5


def test_a_prune_removing_too_much_is_refused_unless_forced() -> None:
    items = daily(10)
    p = plan("db/main", items, Policy(keep_days=2), NOW, None, max_delete_percent=50)
    assert p.held is not None and "max_delete_percent" in p.held and p.remove == []
    forced = plan("db/main", items, Policy(keep_days=2), NOW, None, max_delete_percent=50, force=True)
    assert forced.held is None and len(forced.remove) == 8
