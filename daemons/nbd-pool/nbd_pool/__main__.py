"""python -m nbd_pool"""

from .main import main

main()
