"""Messages name options as the caller spells them: `--force` on the command line, `force=True` through
the Python API (the same error, the same check)."""

from __future__ import annotations

import pytest

from qmerge.spelling import as_keywords
from tests.test_hostile import run


@pytest.mark.parametrize(
    "cli, api",
    [
        ("pass --force to replace it", "pass force=True to replace it"),
        ("pass the base directory with --base.", "pass the base directory with base=."),
        ("pass it with --base DIR.", "pass it with base=DIR."),
        ("or use --merge-base dequantized.", 'or use merge_base="dequantized".'),
        (
            "pass --quant-type fp4 --no-double-quant.",
            'pass quant=QuantSettings(quant_type="fp4", double_quant=False).',
        ),
        ("the --quant-* options differ", "the quant=QuantSettings(...) options differ"),
        ("without --allow-pickle (then", "without allow_pickle=True (then"),
        ("Calibrate --gguf-type iq4_nl instead.", 'Calibrate gguf_type="iq4_nl" instead.'),
        ("unless --allow-other-base.", "unless allow_other_base=True."),
        ("no option here: a-b --", "no option here: a-b --"),
        (  # a command line quoted to be run is kept; the sentence around it is translated
            "Merge instead: qmerge export ADAPTER --to gguf (the merged model), or pass --force.",
            "Merge instead: qmerge export ADAPTER --to gguf (the merged model), or pass force=True.",
        ),
        (
            "export it (qmerge export A --to bf16 -o M), then measure it with qmerge check A --candidate F.gguf.",
            "export it (qmerge export A --to bf16 -o M), then measure it with qmerge check A --candidate F.gguf.",
        ),
    ],
)
def test_options_as_keywords(cli, api):
    assert as_keywords(cli) == api


def test_the_cli_keeps_its_options_and_the_api_says_keywords(tmp_path, fixtures, base16):
    from qmerge import export
    from qmerge.errors import OutputError

    out = tmp_path / "x.gguf"
    out.write_text("mine")
    r = run(["export", fixtures / "adapter-qlora", "--base", base16, "--to", "gguf", "-o", out])
    assert r.exit_code == 1 and "pass --force to replace it" in r.output
    with pytest.raises(OutputError) as e:
        export(fixtures / "adapter-qlora", "gguf", out, base=base16)
    assert "pass force=True to replace it" in str(e.value) and "--" not in str(e.value)
    assert out.read_text() == "mine"
