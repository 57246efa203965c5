"""What every local worker imports, loaded once by ``local_launch``'s fork server so forked workers start warm.

Only imports: nothing here may start threads, touch CUDA or initialise torch.distributed, because the workers are
forked from the process that ran it.
"""

from megatron_zero.utils.cpu_process import prepare_cpu_process

prepare_cpu_process()

import megatron.core.dist_checkpointing  # noqa: E402,F401
import megatron.core.models.gpt  # noqa: E402,F401
import megatron.core.optimizer  # noqa: E402,F401
import transformers  # noqa: E402,F401  (conversion, verification and the tests' references load HF models)

import megatron_zero.parallel.init  # noqa: E402,F401
