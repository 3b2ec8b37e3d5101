"""A small Flask application (routing, a URL converter, query arguments, JSON)."""

from flask import Flask, jsonify, request

app = Flask(__name__)
application = app


@app.get("/items/<int:item_id>")
def item(item_id):
    return jsonify(id=item_id, name=f"item {item_id}", args=request.args.to_dict())
