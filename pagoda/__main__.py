import sys

from pagoda.server.cli import main

if __name__ == "__main__":
    # `python -m pagoda` is the `pagoda` command; `serve` may be left out (but `--help` alone
    # is the command's own, listing the others)
    args = sys.argv[1:]
    implied = not args or (args[0].startswith("-") and args[0] not in ("-h", "--help"))
    main(["serve", *args] if implied else args)
