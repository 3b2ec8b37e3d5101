"""A small Flask application, imported from the virtualenv."""

from flask import Flask, jsonify, request

app = Flask(__name__)


@app.get("/")
def index():
    return "Hello from Flask"


@app.route("/items/<int:item_id>", methods=["GET", "POST"])
def item(item_id):
    payload = request.get_json(silent=True) if request.method == "POST" else None
    return jsonify(id=item_id, method=request.method, payload=payload,
                   script_root=request.script_root, path=request.path,
                   args=request.args.to_dict())


@app.errorhandler(404)
def not_found(e):
    return jsonify(error="not found", path=request.path), 404
