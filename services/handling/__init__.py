"""handling (部门处置): departments 签收 accept, 退回 return, ask for 延期 extensions and 处置 handle their work orders;
departments that run their own systems get every new work order (and rework) pushed to a webhook."""
