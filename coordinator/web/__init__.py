"""The operator web page (``--http-listen``): the sagas, their timelines, and the
Compensate and ResolveCompensation buttons, all through the coordinator's own gRPC API.

Server-rendered HTML (:mod:`coordinator.web.pages`) plus one small plain script
(``static/web.js``): no build step, nothing fetched from elsewhere at run time, and one
renderer for the first view and for the live updates (the event stream sends the same
server-rendered sections again).
"""

from coordinator.web.server import WebServer

__all__ = ["WebServer"]
