"""Reaching the tracking store without writing its secrets anywhere.

A password in a tracking URI would land wherever the URI goes: the study's config in the Optuna storage (which
every worker and optuna-dashboard reads), the parent run's params, printed hints. So the credentials leave the URI
the moment it is read and live in this process's environment, in the variables the clients read themselves:

- an MLflow server (`http(s)://user:password@host`): MLflow's own MLFLOW_TRACKING_USERNAME and
  MLFLOW_TRACKING_PASSWORD (the REST client and the artifact proxy send them as HTTP basic auth);
- a PostgreSQL store (`postgresql://user:password@host/db`): libpq's PGPASSWORD (the user name stays in the URI;
  ~/.pgpass works too).

Other workers get the credentials the same way: in those variables, or in the URL they are given. A password in
any other kind of database URI has no such variable and is refused.
"""

from __future__ import annotations

import base64
import os
import urllib.error
import urllib.parse
import urllib.request

from models.errors import UserError, first_line
from study.workers.storage import mask_url

USERNAME, PASSWORD = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
PG_PASSWORD = "PGPASSWORD"


def split_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """(`uri` without its secrets, the environment variables that carry them); a UserError for a password in a
    database URI that no variable can carry."""
    scheme = uri.partition("://")[0].lower()
    if scheme in ("http", "https"):
        parts = urllib.parse.urlsplit(uri)
        if "@" not in parts.netloc:
            return uri, {}
        userinfo, _, hostport = parts.netloc.rpartition("@")  # the last '@': one in the password stays in it
        user, colon, password = userinfo.partition(":")
        env = {USERNAME: urllib.parse.unquote(user)}
        if colon:
            env[PASSWORD] = urllib.parse.unquote(password)
        return urllib.parse.urlunsplit(parts._replace(netloc=hostport)), env
    if "://" not in uri or scheme in ("sqlite", "file") or uri.partition("://")[2].startswith("/"):
        return uri, {}
    return _split_database(uri, scheme)


def _split_database(uri: str, scheme: str) -> tuple[str, dict[str, str]]:
    from sqlalchemy.engine import make_url

    try:
        url = make_url(uri)
    except Exception:  # noqa: BLE001 - not a database URL (databricks://profile, a plugin's scheme): nothing to take
        return uri, {}
    password = url.password or url.query.get("password")
    if not password:
        return uri, {}
    if not scheme.startswith("postgresql"):
        raise UserError(f"tracking.mlflow_uri '{mask_url(uri)}' holds a password, which would be stored in the "
                        f"study for every reader of its storage to see: leave it out of the URI and give it "
                        f"through the database driver's own option file")
    clean = url._replace(password=None).difference_update_query(["password"])  # set() ignores a None
    return clean.render_as_string(hide_password=False), {PG_PASSWORD: str(password)}


def take_credentials(uri: str) -> str:
    """`uri` without its credentials, which go into this process's environment (see the module docstring; they
    replace what the variables held: the URL given is the one meant)."""
    clean, env = split_credentials(uri)
    os.environ.update(env)
    return clean


def check_server(uri: str, timeout: float = 10.0) -> None:
    """The tracking server at `uri` (no credentials in it) answers its health check and takes this process's
    login (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, when it asks for one); else a one-line UserError."""
    base = uri.rstrip("/")
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=timeout) as response:
            problem = None if response.status == 200 else f"HTTP {response.status}"
    except OSError as exc:  # refused, unresolvable, timed out, HTTP errors
        problem = mask_url(first_line(exc))
    if problem:
        raise UserError(f"cannot reach the MLflow tracking server '{mask_url(uri)}' ({problem}); start it, fix "
                        f"tracking.mlflow_uri / $MLFLOW_TRACKING_URI, or set tracking.enabled: false")
    if _login_refused(base, timeout):
        given = USERNAME in os.environ
        raise UserError(f"the MLflow tracking server '{mask_url(uri)}' "
                        + (f"refused the login of user '{os.environ[USERNAME]}'" if given else "asks for a login")
                        + f": set {USERNAME} and {PASSWORD}, or write USER:PASSWORD@ before the host in "
                          f"tracking.mlflow_uri")


def _login_refused(base: str, timeout: float) -> bool:
    # /health answers everyone; an API call shows whether a server with authentication (`mlflow server
    # --app-name basic-auth`) takes this login. Any other answer is left to the tracker's own calls.
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/experiments/search?max_results=1")
    if USERNAME in os.environ:
        login = f"{os.environ[USERNAME]}:{os.environ.get(PASSWORD, '')}".encode()
        request.add_header("Authorization", "Basic " + base64.b64encode(login).decode())
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):  # MLflow's other login: a bearer token
        request.add_header("Authorization", f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return False
    except urllib.error.HTTPError as exc:
        return exc.code == 401
    except OSError:
        return False
