"""python -m volume_agent"""

from .main import main

main()
