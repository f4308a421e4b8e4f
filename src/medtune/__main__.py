from medtune.cli import app

app()
