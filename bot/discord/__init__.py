"""The Discord frontend: SitcomBot (bot.py), its cogs (one per command group) and utils."""
