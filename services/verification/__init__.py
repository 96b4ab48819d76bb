"""verification (核查): the grid worker (网格员) checks on the spot that the work was done; pass closes the case
(结案), fail sends it back to the department (返工)."""
