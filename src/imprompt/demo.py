"""``make demo``: the main job on the bundled toy model.

The toy world (a shapes dataset, a tiny CLIP, a tiny Stable Diffusion and a toy IP-Adapter built and
shipped by imprompt) is not built yet; until it is, the demo says what it will do.
"""

PLAN = """imprompt demo
=============
The toy world is not shipped yet. Once it is, this demo will:
  1. load the bundled tiny Stable Diffusion, tiny CLIP image encoder and toy IP-Adapter (no download);
  2. for a few shipped reference images, generate an image-only prompt and two image+text prompts;
  3. write one contact sheet (reference | generations, labelled) and the individual PNGs to outputs/demo/;
  4. print a table of how well each generation matches its reference's attributes.
Meanwhile `imprompt generate --help` shows the command line, and `make test` runs the test suite.
"""


def main() -> int:
    print(PLAN)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
