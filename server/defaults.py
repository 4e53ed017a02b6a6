"""Default limits of the server, shared by `pagoda serve`'s options (server/cli.py) and the
modules that apply them. Kept apart from those modules (torch, uvicorn: seconds of imports), so
that the `pagoda` command parses its arguments, and `pagoda keys` runs, in about a second."""

MAX_BODY_BYTES = 16 << 20
BODY_TIMEOUT_S = 30.0  # a body (chunked, or short of its Content-Length) must arrive
STREAM_SEND_TIMEOUT_S = 30.0  # a stream waits this long for a client that stopped reading
MAX_FAILED_STARTS = 5  # restarts in a row that never got ready: the model is given up
# /v1/responses kept in memory for previous_response_id and GET (the oldest go first)
MAX_STORED_RESPONSES = 4096
