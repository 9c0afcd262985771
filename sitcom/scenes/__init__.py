"""What a scene is and how good it is: the script format, line text, cheap quality scores,
the humour model and best-of-n ranking. Pure text; no model or decoding code."""
