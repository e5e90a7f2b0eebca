import asyncio

import typer

from disagfusion.config import comma_list
from services.engram_store.config import EngramStoreSettings
from services.engram_store.store import serve


def main(
    arena: list[str] = typer.Option(  # noqa: B008 - typer declares options this way
        [], help="LOCATION or LOCATION<=SOURCE; repeatable. Defaults to DF_ENGRAM_ARENAS."
    ),
) -> None:
    settings = EngramStoreSettings()
    entries = arena or comma_list(settings.engram_arenas)
    asyncio.run(serve(settings, entries))


if __name__ == "__main__":
    typer.run(main)
