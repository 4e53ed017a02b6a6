import sys

from pagoda.server.cli import main

if __name__ == "__main__":
    # `python -m pagoda` is the `pagoda` command; `serve` may be left out
    args = sys.argv[1:]
    main(args if args[:1] and not args[0].startswith("-") else ["serve", *args])
