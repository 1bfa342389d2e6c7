"""Pure math: circuit angles -> exact orthogonal / Stiefel matrices. Imports torch only."""

from qpeft.circuits.statevector import (  # noqa: E402,F401  (helper "qpa")
    MAX_QUBITS,
    cnot_ladder_permutation,
    qnn_num_params,
    qnn_probabilities,
    qnn_statevector,
)
