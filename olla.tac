# twistd -ny olla.tac -- the same service tree as `twistd -n olladmr`.
# The config file is found as usual: $OLLA_CONFIG_FILE, ./config.yaml,
# /etc/olladmr/config.yaml, or the built-in defaults.
import os

from twisted.application import service

from olladmr.tap import makeService

application = service.Application("olladmr")
makeService({"config": os.environ.get("OLLA_CONFIG_FILE"), "listen": os.environ.get("OLLA_LISTEN")}).setServiceParent(
    application
)
