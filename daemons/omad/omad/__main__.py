"""python -m omad"""

from .main import main

main()
