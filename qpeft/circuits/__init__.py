"""Pure math: circuit angles -> exact orthogonal / Stiefel matrices. Imports torch only."""
