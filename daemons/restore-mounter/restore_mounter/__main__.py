"""python -m restore_mounter"""

from .main import main

main()
