"""A local fake Modal control plane for end-to-end tests of the real `modal` client (1.6.4).

`server.FakeModal` serves the gRPC API on loopback and runs function bodies in-process;
`fixtures.modal_fake` installs it for one test; `toy_app` is the app its own tests deploy.
Nothing here imports modal at package import time (the fixtures plugin loads in every run).
"""
