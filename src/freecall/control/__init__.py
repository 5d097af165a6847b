"""freecall.control"""
