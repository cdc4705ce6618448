"""Standard-library modules that one of the Pythons ComfyUI supports (3.10 to 3.13) lacks."""

OLDEST = (3, 10)
NOT_ON_EVERY_SUPPORTED_PYTHON = frozenset({
    "tomllib", "wsgiref.types",  # new in 3.11
    "distutils", "imp", "asynchat", "asyncore", "smtpd",  # removed in 3.12
    "aifc", "audioop", "cgi", "cgitb", "chunk", "crypt", "imghdr", "lib2to3", "mailcap", "msilib", "nis",
    "nntplib", "ossaudiodev", "pipes", "sndhdr", "spwd", "sunau", "telnetlib", "uu", "xdrlib",  # removed in 3.13
})
