"""A FastAPI app with a JSON body validated by pydantic and a 1 ms await: bench/realistic.py's ASGI row.

    POST /items {"name": str, "price": float, "tags": [str]} -> a JSON object computed from it
    GET /        -> {"ok": true} (the bench waits on it before checking POST /items)
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI()


class Item(BaseModel):
    name: str
    price: float
    tags: list[str] = []


@app.get("/")
async def ready() -> dict[str, bool]:
    return {"ok": True}


@app.post("/items")
async def create_item(item: Item) -> dict[str, object]:
    await asyncio.sleep(0.001)  # a database or service call, as a real endpoint would await
    tags = sorted({t.lower() for t in item.tags})
    return {
        "name": item.name.title(),
        "price": item.price,
        "price_with_tax": round(item.price * 1.2, 2),
        "tags": tags,
        "tag_count": len(tags),
    }
