"""The ``adapterops`` command line: thin click commands over the library.

Each submodule registers its commands on ``main``.
"""

import click

from .. import __version__
from ._common import Group


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="adapterops")
def main() -> None:
    """LoRA adapters as values: blend, compress, merge, quantize, train and diagnose.

    Set ADAPTEROPS_DEBUG=1 to see full tracebacks on errors.
    """


from . import adapter_commands  # noqa: E402,F401  (registers commands)
from . import merge_commands  # noqa: E402,F401  (registers commands)
from . import diagnose_commands  # noqa: E402,F401  (registers commands)
from . import quant_commands  # noqa: E402,F401  (registers commands)
from . import train_commands  # noqa: E402,F401  (registers commands)
from . import check_commands  # noqa: E402,F401  (registers commands)
from . import eval_commands  # noqa: E402,F401  (registers commands)
