from .app import build

build().run()
