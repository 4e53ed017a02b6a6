import sys

from server.cli import main

if __name__ == "__main__":
    # `python -m server` is `pagoda`; the `serve` command may be left out
    args = sys.argv[1:]
    main(args if args[:1] == ["serve"] else ["serve", *args])
