"""Starts Canaille (PyPI `canaille[oidc]`) as an OAuth2 authorization server with its SCIM 2.0
server, in memory, for scimsync's OAuth interop test: one confidential client that may use the
client_credentials grant (HTTP Basic client authentication).

Usage: python canaille_server.py PORT CLIENT_ID CLIENT_SECRET
"""

import datetime
import sys

from canaille import create_app
from canaille.app import models
from canaille.backends import Backend
from werkzeug.serving import run_simple

port, client_id, client_secret = int(sys.argv[1]), sys.argv[2], sys.argv[3]
issuer = f"http://127.0.0.1:{port}"
config = {
    "SECRET_KEY": "scimsync-interop",
    "SERVER_NAME": f"127.0.0.1:{port}",
    "PREFERRED_URL_SCHEME": "http",
    "WTF_CSRF_ENABLED": False,
    "CANAILLE": {"DATABASE": "memory", "CAPTCHA_ENABLED": False},
    "CANAILLE_OIDC": {"JWT": {"ISS": issuer}},
    "CANAILLE_SCIM": {"ENABLE_SERVER": True},
}
app = create_app(config)
with app.app_context():
    client = models.Client(
        client_id=client_id,
        client_secret=client_secret,
        client_id_issued_at=datetime.datetime.now(datetime.timezone.utc),
        client_name="scimsync",
        grant_types=["client_credentials"],
        response_types=[],
        token_endpoint_auth_method="client_secret_basic",
        scope=["openid", "profile", "email", "groups"],
        redirect_uris=[],
    )
    Backend.instance.save(client)
    client.audience = [client]
    Backend.instance.save(client)
run_simple("127.0.0.1", port, app, threaded=True, use_reloader=False)
