from medcap.cli import main

main()
