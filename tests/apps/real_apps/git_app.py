"""dulwich's smart HTTP git server, unmodified (as `dulwich web` sets it up),
serving the bare repository repos/repo.git beside this file as /PREFIX/repo.git."""

from pathlib import Path

from dulwich.repo import Repo
from dulwich.server import DictBackend
from dulwich.web import make_wsgi_chain

REPO = Repo(str(Path(__file__).parent / "repos" / "repo.git"))
application = make_wsgi_chain(DictBackend({"/repo.git": REPO}))
