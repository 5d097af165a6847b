"""freecall.routing"""
