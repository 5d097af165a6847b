"""freecall.sip"""
