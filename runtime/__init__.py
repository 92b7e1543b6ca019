"""Python face of the native C runtime (native/): the cffi binding and a thin session class."""
