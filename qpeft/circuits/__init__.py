"""Pure math: circuit angles -> exact orthogonal / Stiefel matrices. Imports torch only."""

from qpeft.circuits.compound import (  # noqa: E402,F401  (helper "circuits-quic")
    compound,
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
from qpeft.circuits.statevector import (  # noqa: E402,F401  (helper "qpa")
    MAX_QUBITS,
    cnot_ladder_permutation,
    qnn_num_params,
    qnn_probabilities,
    qnn_statevector,
)
