"""Pure math: circuit angles -> exact orthogonal / Stiefel matrices. Imports torch only."""

from qpeft.circuits.compound import (  # noqa: E402,F401  (helper "circuits-quic")
    compound,
    compound_apply,
    compound_apply_cost,
    compound_dim,
    compound_sector_dim,
    compounds,
    k_subsets,
    largest_block_size,
)
from qpeft.circuits.givens import (  # noqa: E402,F401  (helper "circuits-quic")
    GIVENS_LAYOUTS,
    givens_apply,
    givens_decompose,
    givens_matrix,
    givens_num_params,
    givens_pairs,
)
from qpeft.circuits.lie import (  # noqa: E402,F401  (helper "circuits-qpeft")
    cayley,
    expm_orthogonal,
    lie_stiefel,
    lie_stiefel_num_params,
    skew,
    taylor_orthogonal,
)
from qpeft.circuits.pauli import (  # noqa: E402,F401  (helper "circuits-qpeft")
    pauli_apply,
    pauli_gates,
    pauli_num_params,
    pauli_stiefel,
)
from qpeft.circuits.qsd import (  # noqa: E402,F401  (helper "circuits-qpeft")
    generalized_apply,
    generalized_num_params,
    generalized_stiefel,
)
from qpeft.circuits.statevector import (  # noqa: E402,F401  (helper "qpa")
    MAX_QUBITS,
    cnot_ladder_permutation,
    qnn_num_params,
    qnn_probabilities,
    qnn_statevector,
)
from qpeft.circuits.stiefel import (  # noqa: E402,F401  (helper "circuits-qpeft")
    STIEFEL_METHODS,
    stiefel,
    stiefel_init,
    stiefel_num_params,
)
