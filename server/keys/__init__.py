"""API keys with limits, and the usage ledger, in a database (SQLite by default, PostgreSQL by
URL). `gateway` is the server's side (auth, limits, metering), `store` the database's,
`commands` the `pagoda keys` and `pagoda usage` commands."""
