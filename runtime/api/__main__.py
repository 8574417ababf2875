"""`python -m flashllm ...` is the `flashllm` command."""
import sys

from flashllm.runtime.clients.cli import main

sys.exit(main())
