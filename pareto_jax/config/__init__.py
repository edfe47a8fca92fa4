"""Every configuration record of pareto_jax and every default, in one package that imports no JAX.

The problem (a loss, parameters, data) is always passed separately; these records hold the
numerical and experimental choices, one frozen dataclass per stage (STYLE §3), validated when
built (each error names the field, what was got and the fix). Because nothing here imports JAX,
the command line reads its flags' defaults from these records and refuses a bad flag before JAX
is loaded, and `pareto_jax.io.fingerprint` keys every stage artifact to them.

Each default is written once, here: the modules that use a record take it (or read a field's
default from the class, e.g. ``ReweightConfig.w_max``), and the names each choice may take are the
vocabularies of `vocabulary` (`SOLVERS`, `PROGRAM_SOLVERS`, ...), checked here only.

* `vocabulary`: the names and shared constants;
* `stages`: `TrainConfig`, `InfluenceConfig`, `ReweightConfig`, `BaselineConfig`, `SearchConfig`,
  `RoundsConfig`;
* `jobs`: `DataConfig`, `ModelConfig`, `RunConfig`, `ImproveConfig`.
"""

from .jobs import DataConfig, ImproveConfig, ModelConfig, RunConfig
from .stages import (
    BaselineConfig,
    InfluenceConfig,
    ReweightConfig,
    RoundsConfig,
    SearchConfig,
    TrainConfig,
)
from .vocabulary import (
    CURVATURES,
    DATASETS,
    EXECUTIONS,
    MODEL_KINDS,
    NO_DAMPING,
    NORMALIZERS,
    OPTIMIZERS,
    PRECONDITIONERS,
    PRODUCT_INFLUENCE,
    PROGRAM_SOLVERS,
    RETRAIN,
    ROW_METHODS,
    SOLVERS,
    TEXT_FEATURES,
    TRUST_REGION,
    weight_bounds,
)

__all__ = ["RoundsConfig", "DataConfig", "ImproveConfig", "ModelConfig", "RunConfig",
    "BaselineConfig", "InfluenceConfig", "ReweightConfig", "SearchConfig", "TrainConfig",
    "CURVATURES", "DATASETS", "EXECUTIONS", "MODEL_KINDS", "NO_DAMPING", "NORMALIZERS",
    "OPTIMIZERS", "PRECONDITIONERS", "PRODUCT_INFLUENCE", "PROGRAM_SOLVERS", "RETRAIN",
    "ROW_METHODS", "SOLVERS", "TEXT_FEATURES", "TRUST_REGION", "weight_bounds"]
