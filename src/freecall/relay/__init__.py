"""freecall.relay"""
