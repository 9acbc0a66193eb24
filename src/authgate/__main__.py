from authgate.cli import app

app(prog_name="authgate")
