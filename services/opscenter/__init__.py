"""opscenter (城运中心): folds the lifecycle log into a read model and serves the town's closure metrics, the
overdue list and a live map (风险一张图)."""
