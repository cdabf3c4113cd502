import sys

from . import main

if __name__ == "__main__":  # (importing the module, as pkgutil.walk_packages does, runs nothing)
    sys.exit(main())
