import sys

from keras_openpi.cli import main

sys.exit(main())
