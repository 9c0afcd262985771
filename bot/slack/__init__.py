"""The Slack frontend: slack-bolt's AsyncApp over the same Core as Discord and the console.

`app.py` holds the command and event handlers and the Socket Mode / HTTP mode runner,
`surface.py` the posting adapter (bot.posting.Surface) and Slack's text escaping,
`manifest.yaml` creates the app in one paste.
"""
