"""The web console: a read-only page over a running stack's bus, log and projections.

Layout: `settings` contains the options and the rules for binding and
tokens. `sources` opens the stack's bus, event log and projection database.
`sampler` and `feed` are the background threads behind the overview and the
live events. `queries` and `timetravel` serve the namespace, key and
past-state views. `server` is the Starlette app that serves them with the
front end in `static/`, behind `access` (token, Host and Origin checks), and
`live` streams the events and samples to the open pages.
"""

from tiermem.console.server import create_app, serve
from tiermem.console.settings import ConsoleSettings, SettingsError

__all__ = ["ConsoleSettings", "SettingsError", "create_app", "serve"]
