"""dispatch (指挥中心): 立案 file or reject, merge duplicates, 派遣 route to departments, follow every work order,
re-route returns, ask for 核查 verification, 结案 close, and watch deadlines (催办 / 督办)."""
