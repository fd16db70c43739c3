"""Verification, one module per thing checked, each task named for it:

* ``dump`` (``verify-dump``): a stored database dump read back; deep, decrypted, decompressed and
  listed by ``pg_restore --list`` with every counted table's data entry present.
* ``restored_db`` (``verify-restored-db``): a restored database: row counts against the manifest,
  the application's login and queries.
* ``file_archive`` (``verify-file-archive``): a stored file archive and its index read back, every
  stored file against the index, the older archives of its chain present.
* ``config_archive`` (``verify-config-archive``): a stored config archive read back against its own
  index and what the fetch recorded.
* ``restored_configs`` (``verify-restored-configs``): restored config files read back from the host.

``readback`` holds what they share: size and sha256 of a stored object, and the check rows.
(A restored file tree's md5 check lives with its destinations, in ``flows/files_restore.py``.)
"""
