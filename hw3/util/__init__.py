"""What every part shares: errors for people, atomic files, safe loading, the device, memory and disk."""
