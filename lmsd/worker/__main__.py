from lmsd.worker.process import main

main()
