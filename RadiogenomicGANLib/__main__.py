"""`python -m RadiogenomicGANLib insert ...` — see `RadiogenomicGANLib.cli`."""

from RadiogenomicGANLib.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
