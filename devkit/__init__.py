"""Development and test support, not part of the backup system: throwaway local servers (PostgreSQL,
an S3 server, sshd, Prefect), the sample Luxima data, and the demo built from them. Used by the tests,
the benchmarks and ``luxima-backup demo``; the library (``luxima_backup``) never imports it."""
