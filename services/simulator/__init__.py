"""A simulation of Gaohang town (高行镇) driving gridloop through its public HTTP APIs only.

``python -m services.simulator demo`` starts every service, lets grid workers (网格员), citizens on the 12345
hotline and sensors report incidents, departments accept, return, ask for more time and handle their work
orders, the operations center (城运中心) decides extensions and grid workers verify — then prints a table per
department computed from the incidents' public timelines.

Modules: ``town`` (the seeded report mix, pure), ``actors`` (the asyncio actors over httpx), ``report`` (the
per-department table from timelines, pure), ``demo`` (environment, services, progress, outcome).
"""
